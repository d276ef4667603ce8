"""compress: find the eligible convolutions, decide each one's options, swap in versatile layers."""
