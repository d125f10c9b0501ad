// portcullis: the self-service page
