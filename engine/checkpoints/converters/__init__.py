"""One module per released checkpoint layout (radzero today)."""
