"""torch_ops: autograd functions, nn.Modules and optimizers over qkernels (filled in by the
layer and optimizer families)."""
