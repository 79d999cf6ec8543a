from setuptools import setup

setup(name="poltergust-testpipes", version="1.3", py_modules=["poltergust_testpipes", "poltergust_fleet_tasks"],
      install_requires=["luigi"])
