"""BLIP-2 Studio: the Gradio app over the `blip2` library (the library never imports this package).

    from app.service import Service
    from app.ui import build_demo, launch_kwargs
    svc = Service()                      # the embedded model, limits from BLIP2_* environment variables
    demo = build_demo(svc)
    demo.launch(**launch_kwargs(svc))
"""
