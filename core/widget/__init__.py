"""The hub's own web pages for people: the embeddable chat widget (``/widget.js``, a demo
page at ``/chat``) and the agents' inbox (``/inbox``). Plain JavaScript files served
from ``static/``; nothing is fetched from anywhere else at run time."""
