"""Data files tfl reads at run time (ImageNet class names, the Fashion-MNIST task table); not code."""
