from qnpu.testing import register_profiles

register_profiles()
