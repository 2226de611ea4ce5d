"""The commands: stim-train (train_stim.py), stim-analyze, stim-export, stim-convert, stim-push."""
