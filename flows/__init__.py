"""flows of saema (see DESIGN.md §2)."""
