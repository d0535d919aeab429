"""Where artifacts live: one store interface (a folder or an object store), versioned
atomic artifacts over it, and Prefect's cache records read as untrusted data."""
