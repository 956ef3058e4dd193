"""Data that ships with attnscope, so inference, the demo and the tests need nothing installed by hand."""
