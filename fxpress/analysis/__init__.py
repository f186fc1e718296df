"""Analyses shared by passes: block stacks, attention blocks, dimension flow, constants, value recording."""
