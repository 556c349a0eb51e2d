"""Search an embeddings file: `python scripts/search.py emb.parquet --text "red silk saree"`."""

from clip_accel.cli import search_main

if __name__ == "__main__":
    search_main()
