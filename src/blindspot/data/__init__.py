"""blindspot.data"""
