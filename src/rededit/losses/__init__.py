"""rededit.losses"""
