"""blindspot.report"""
