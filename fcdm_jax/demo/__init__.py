"""What only the demos use: the coloured-digit captioned dataset of the text-to-image
demo and the two judges that score demo samples with a small digit classifier."""
