"""Memory: ``estimate`` predicts bytes from shapes; ``probe`` reads what was really allocated."""
