"""Training runtime shared by every trainer: accelerator, seeding, checkpoints, EMA, tracking, images, guards.

Plain functions and small classes; trainers compose them (no base class with behaviour).
"""
