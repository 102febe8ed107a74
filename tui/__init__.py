"""edgepack chat TUI (Textual) over runtime/."""
