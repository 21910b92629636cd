"""rededit.utils"""
