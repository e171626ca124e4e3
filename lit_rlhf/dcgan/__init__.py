"""The DCGAN side study: a DCGAN on MedMNIST, the classifier whose features measure it, and the GAN report.

Layers, each importing only those before it: medmnist (data) -> model -> metrics -> classifier,
module (Lightning modules) -> report."""
