"""Step 2 of the flow: fetch a listed post's file, verify it, store it by content hash."""
