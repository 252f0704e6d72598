"""blindspot.attacks"""
