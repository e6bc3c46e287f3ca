"""One module per paper, named after the method."""
