"""rededit.cli"""
