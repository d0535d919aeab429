"""The inference runtime: the checkpoint a select writes, the compiled plan it becomes, the
plan's tree walk, and chunked batch prediction over CSV or Parquet."""
