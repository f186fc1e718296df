"""Training loops that compression methods need: MST-regularized BNN fine-tuning, token autoencoders."""
