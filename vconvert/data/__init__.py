"""Image data: digits and image folders with one transform policy, and a device-resident loader."""
