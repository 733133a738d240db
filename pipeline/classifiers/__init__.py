"""The classifier zoo, apart from the core: architecture names (``archs``), their builders and
safetensors checkpoints (``zoo``), and RobustBench's CIFAR architectures module for module
(``rb_archs``). The stages that train or judge a classifier (train, evaluate, and generate's
reference classifier) depend on it; diffusion, extract and prepare do not."""
