from setuptools import setup

setup(name="poltergust-testpipes", version="1.0", py_modules=["poltergust_testpipes"], install_requires=["luigi"])
