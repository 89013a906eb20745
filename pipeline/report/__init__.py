"""Reports of a check: terminal table, Markdown, HTML with plots, JSON, and audio files to listen to."""
