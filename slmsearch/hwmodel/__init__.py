"""hwmodel"""
