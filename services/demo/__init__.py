"""`scoremesh demo`: the whole loop on the embedded stack, told as a story with a picture."""
