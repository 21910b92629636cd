"""rededit.flow"""
