"""Beside other libraries: the PEFT LoRA baseline, transformers' Trainer."""
