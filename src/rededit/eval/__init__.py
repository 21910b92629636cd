"""rededit.eval"""
