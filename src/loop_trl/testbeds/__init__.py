"""Small, CPU-sized worlds in which RL fine-tuning can be measured."""
