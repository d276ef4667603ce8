"""Small reference CNNs for vconvert's demo, tests and benchmarks (``--arch sample_models.<module>:<function>``)."""

# The builders an arch string read back from a .vc.pt may name without --trust (vconvert.io checks that
# this package is the one installed next to vconvert before it imports anything from it).
MODEL_BUILDERS = ("resnet_cifar:resnet8", "resnet_cifar:resnet20", "resnet_cifar:resnet56", "vgg_small:vgg_small")
