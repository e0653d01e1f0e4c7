"""`btx`, the command line: the one layer above both the library and flows/."""
