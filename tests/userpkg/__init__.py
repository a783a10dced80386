"""A stand-in for a user's own installed package: networks dmdcopy knows nothing about, for the
``--teacher-arch`` / ``--student-arch`` / ``convert --arch`` tests."""
