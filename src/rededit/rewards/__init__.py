"""rededit.rewards"""
