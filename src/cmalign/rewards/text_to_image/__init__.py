"""text_to_image."""
