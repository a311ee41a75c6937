"""The front doors: each turns its API's requests into the generation core's input, and the
core's steps into its own wire format."""
