"""Local tooling: script/predict, script/server, the offline demo model and the schema writer.

Nothing on the request path imports this package; a cog image runs predict.py and engine/.
"""
