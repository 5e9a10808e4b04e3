"""Cache nodes as the product sees them: topology discovery, hash slots, restore targets."""
