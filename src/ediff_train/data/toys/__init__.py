"""The embedded toy data sets, built offline from a seed: the digits (and their small VAE) and
the captioned shapes. Each writes ordinary shard sets, so a toy run exercises the same data path
as a real T5/CLIP shard set."""
