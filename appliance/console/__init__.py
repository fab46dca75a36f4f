"""The console pages beyond the stock admin: dashboard, usage, staff chat, sign-in."""
