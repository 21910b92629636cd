"""rededit.stages"""
