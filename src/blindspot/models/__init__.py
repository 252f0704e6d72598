"""blindspot.models"""
