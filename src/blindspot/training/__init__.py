"""blindspot.training"""
