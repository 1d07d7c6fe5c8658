"""Adapters and checkpoints written by other libraries (HF peft) read into deltatune and written back."""
