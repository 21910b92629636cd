"""rededit.callbacks"""
