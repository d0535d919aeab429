"""The data and its features: sources and the monthly feed, the preprocessing itself (no
Prefect), and the K-fold splits."""
