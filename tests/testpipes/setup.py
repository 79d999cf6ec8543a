from setuptools import setup

setup(name="poltergust-testpipes", version="1.2", py_modules=["poltergust_testpipes"], install_requires=["luigi"])
